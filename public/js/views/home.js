/* The logged-in screen: the conversation list, the shown conversation (or
 * the room directory) with its input, and the people beside it: the online
 * users, or a room's members. */
(function (ChatApp, Backbone, _) {
  'use strict';

  var views = ChatApp.views;

  ChatApp.views.HomeView = Backbone.View.extend({
    className: 'home-screen',
    template: ChatApp.template('home-template'),
    conversationTemplate: ChatApp.template('conversation-template'),
    headerTemplate: ChatApp.template('conversation-header-template'),
    olderTemplate: ChatApp.template('older-template'),
    usersTemplate: ChatApp.template('users-panel-template'),
    membersTemplate: ChatApp.template('members-panel-template'),

    events: {
      'submit #chatForm': 'send',
      'click [data-action="older"]': 'loadOlder',
      'input #chatInput': 'typed',
      'click [data-action="leave"]': 'leave'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.conversation = null; // the one shown (null: the directory)
      this.listenTo(this.model, 'change:online', this.renderOnline);
      this.listenTo(this.model, 'change:chatError', this.renderError);
      this.listenTo(this.model, 'change', function () {
        // select() sets both at once: one render.
        if (this.model.hasChanged('active') || this.model.hasChanged('directory')) {
          this.renderMain();
        }
      });
      this.listenTo(this.model, 'unsent', this.restore);
    },

    me: function () {
      var model = this.model;
      return function () { return model.get('me'); };
    },

    render: function () {
      this.removeParts();
      if (this.conversationList) {
        this.conversationList.remove();
      }
      this.$el.html(this.template({}));
      this.conversationList = new views.ConversationListView({
        el: this.$('.conv-side').get(0), model: this.model, vent: this.vent
      }).render();
      this.renderMain();
      return this;
    },

    // The middle and right panels, for the conversation shown (or the directory).
    renderMain: function () {
      if (this.conversation && this.$('#chatInput').length) {
        // Keep what was typed for when this conversation is shown again.
        this.conversation.set('draft', this.$('#chatInput').val());
      }
      this.removeParts();
      var panel = this.$('#convPanel');
      if (this.model.get('directory')) {
        this.conversation = null;
        this.directory = new views.RoomDirectoryView({ model: this.model.directory, home: this.model, vent: this.vent });
        panel.empty().append(this.directory.render().el).attr('aria-label', 'Rooms');
        this.renderPeople(null);
        if (this.el.isConnected) {
          this.directory.shown();
        }
        return;
      }
      var conversation = this.conversation = this.model.activeConversation();
      panel.html(this.conversationTemplate({})).attr('aria-label', conversation.isLobby() ? 'Lobby' : conversation.get('name'));
      this.listenTo(conversation, 'change:name change:topic change:peerOnline', this.renderHeader);
      this.listenTo(conversation, 'change:historyAvailable change:reachedStart change:loadingOlder', this.renderOlder);
      this.chatList = new views.ChatListView({
        el: this.$('#chatList').get(0),
        collection: conversation.chats,
        scroller: this.$('#chatScroll').get(0),
        newBelow: this.$('#newBelow').get(0),
        me: this.me()
      }).render();
      this.$('#chatInput').val(conversation.get('draft'));
      this.renderHeader();
      this.renderPeople(conversation);
      this.renderOnline();
      this.renderError();
      this.renderOlder();
      if (this.el.isConnected) {
        this.$('#chatInput').trigger('focus');
      }
    },

    removeParts: function () {
      if (this.conversation) {
        this.stopListening(this.conversation);
      }
      _.invoke(_.compact([this.chatList, this.people, this.directory]), 'remove');
      this.chatList = this.people = this.directory = null;
    },

    // A room shows its members; the lobby, a PM and the directory the online users.
    renderPeople: function (conversation) {
      var aside = this.$('#peoplePanel');
      if (conversation && conversation.get('kind') === 'room') {
        aside.html(this.membersTemplate({})).attr('aria-label', 'Members');
        this.people = new views.UserListView({
          el: this.$('#memberList').get(0), collection: conversation.members,
          badge: this.$('#memberCount').get(0), me: this.me(), vent: this.vent, presence: true
        }).render();
      } else {
        aside.html(this.usersTemplate({})).attr('aria-label', 'Online users');
        this.people = new views.UserListView({
          el: this.$('#userList').get(0), collection: this.model.users,
          badge: this.$('#userCount').get(0), me: this.me(), vent: this.vent
        }).render();
      }
    },

    // Called by the container once the view is in the document.
    shown: function () {
      if (this.directory) {
        this.directory.shown();
        return;
      }
      this.chatList.scrollToBottom();
      this.$('#chatInput').trigger('focus');
    },

    renderHeader: function () {
      if (this.conversation) {
        this.$('#convHeader').html(this.headerTemplate(this.conversation.toJSON()));
      }
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
      var conversation = this.conversation;
      if (!conversation) {
        return;
      }
      this.$('#chatOlder').html(this.olderTemplate({
        available: conversation.get('historyAvailable'),
        reachedStart: conversation.get('reachedStart'),
        loading: conversation.get('loadingOlder')
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
      this.vent.trigger('chat', text, this.conversation);
    },

    typed: function () {
      if (this.model.get('chatError')) {
        this.model.set('chatError', '');
      }
    },

    // A message the server refused: give it back unless something new was typed.
    restore: function (text, conversation) {
      if (conversation && conversation !== this.conversation) {
        if (!conversation.get('draft')) {
          conversation.set('draft', text);
        }
        return;
      }
      var input = this.$('#chatInput');
      if (!input.val()) {
        input.val(text);
      }
    },

    loadOlder: function () {
      if (this.conversation && !this.conversation.get('loadingOlder')) {
        this.vent.trigger('loadOlder', this.conversation);
      }
    },

    leave: function () {
      if (this.conversation && this.conversation.get('kind') === 'room') {
        this.vent.trigger('leaveRoom', this.conversation);
      }
    },

    remove: function () {
      this.removeParts();
      if (this.conversationList) {
        this.conversationList.remove();
      }
      return Backbone.View.prototype.remove.call(this);
    }
  });
})(ChatApp, Backbone, _);
