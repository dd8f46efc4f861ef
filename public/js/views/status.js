/* The connection indicator in the navigation bar. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.StatusView = Backbone.View.extend({
    template: ChatApp.template('status-template'),

    events: {
      'click [data-action="reconnect"]': 'reconnect',
      'click [data-action="sign-out"]': 'signOut'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.listenTo(this.model, 'change', this.render);
    },

    render: function () {
      this.$el.html(this.template(this.model.view()));
      return this;
    },

    reconnect: function () {
      this.vent.trigger('reconnect');
    },

    signOut: function () {
      this.vent.trigger('signOut');
    }
  });
})(ChatApp, Backbone);
