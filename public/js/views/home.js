/* The lobby: chat lines with their input, and the online users. */
(function (ChatApp, Backbone, _) {
  'use strict';

  ChatApp.views.HomeView = Backbone.View.extend({
    className: 'home-screen',
    template: ChatApp.template('home-template'),
    olderTemplate: ChatApp.template('older-template'),

    events: {
      'submit #chatForm': 'send',
      'click [data-action="older"]': 'loadOlder',
      'input #chatInput': 'typed'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.listenTo(this.model, 'change:online', this.renderOnline);
      this.listenTo(this.model, 'change:chatError', this.renderError);
      this.listenTo(this.model, 'change:historyAvailable change:reachedStart change:loadingOlder', this.renderOlder);
      this.listenTo(this.model, 'unsent', this.restore);
    },

    render: function () {
      var model = this.model;
      var me = function () { return model.get('me'); };
      _.invoke(_.compact([this.chatList, this.userList]), 'remove');
      this.$el.html(this.template({}));
      this.chatList = new ChatApp.views.ChatListView({
        el: this.$('#chatList').get(0),
        collection: model.chats,
        scroller: this.$('#chatScroll').get(0),
        newBelow: this.$('#newBelow').get(0),
        me: me
      }).render();
      this.userList = new ChatApp.views.UserListView({
        el: this.$('#userList').get(0),
        collection: model.users,
        badge: this.$('#userCount').get(0),
        me: me
      }).render();
      this.renderOnline();
      this.renderError();
      this.renderOlder();
      return this;
    },

    // Called by the container once the view is in the document.
    shown: function () {
      this.chatList.scrollToBottom();
      this.$('#chatInput').trigger('focus');
    },

    renderOnline: function () {
      var online = this.model.get('online');
      this.$el.toggleClass('offline', !online);
      this.$('#chatInput').attr('placeholder', online
        ? 'Type a message and press Enter'
        : 'Not connected: messages can be sent once reconnected');
    },

    renderError: function () {
      this.$('#chatError').text(this.model.get('chatError'));
    },

    renderOlder: function () {
      this.$('#chatOlder').html(this.olderTemplate({
        available: this.model.get('historyAvailable'),
        reachedStart: this.model.get('reachedStart'),
        loading: this.model.get('loadingOlder')
      }));
    },

    send: function (event) {
      event.preventDefault();
      var input = this.$('#chatInput');
      var text = input.val();
      if (!text.trim()) {
        input.val('');
        return;
      }
      if (!this.model.get('online')) {
        this.model.set('chatError', 'Not connected: the message was not sent.');
        return;
      }
      input.val('');
      this.model.set('chatError', '');
      this.vent.trigger('chat', text);
    },

    typed: function () {
      if (this.model.get('chatError')) {
        this.model.set('chatError', '');
      }
    },

    // A message the server refused: give it back unless something new was typed.
    restore: function (text) {
      var input = this.$('#chatInput');
      if (!input.val()) {
        input.val(text);
      }
    },

    loadOlder: function () {
      if (!this.model.get('loadingOlder')) {
        this.vent.trigger('loadOlder');
      }
    },

    remove: function () {
      _.invoke(_.compact([this.chatList, this.userList]), 'remove');
      return Backbone.View.prototype.remove.call(this);
    }
  });
})(ChatApp, Backbone, _);
